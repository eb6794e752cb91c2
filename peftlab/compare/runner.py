"""``peftlab compare``: every method fine-tuned with one shared budget on the same data, ranked.

The base model and data are loaded once; each (method, seed) trains a fresh copy of the base
through the same SFT loop (``peftlab.train.loop.train``). ``with_peft`` trains the same settings
with HF PEFT attached instead, through the same loop, so the only difference is the adapter code.
"""
from __future__ import annotations

import copy
import datetime as dt
import math
import json
import platform
import random
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import peftlab
from peftlab.compare import report
from peftlab.compare.params import shared_overrides
from peftlab.kv_prefill import is_kv_table
from peftlab.core.state import atomic_write_bytes

SEED_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]

# One shared budget per preset. "default" fits 2 CPU cores in minutes; "seed000" is the seed's run.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(max_steps=8, batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=1, lr_scheduler="linear",
                    max_length=64, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                    train_size=400, eval_size=16, eval_batch_size=8, kv_prefix_init="data"),
    "seed000": dict(max_steps=300, batch_size=4, grad_accum=2, lr=1e-4, warmup_steps=30, lr_scheduler="cosine",
                    max_length=512, r=4, lora_alpha=8, lora_dropout=0.05, target_modules=SEED_TARGETS,
                    train_size=1000, eval_size=200, eval_batch_size=4, kv_prefix_init="data"),
}
# kv_prefix_init "data": a method whose adapter is a bare KV table (prefix tuning without its encoder, Cartridges) starts
# from the base model's cache of the first training tokens (peftlab/kv_prefill.py; both papers' init) instead of PEFT's
# random N(0, 1) table, which ended far above the base model's loss (5.54 / 5.62 against 4.26, twenty-sixth session);
# "method": every method's own init.
KV_PREFIX_INITS = ("data", "method")
# Methods the seed compares; AdaLoRA's schedule there: tinit 10%, tfinal 50%, deltaT 10% of the steps.
SEED_METHODS = ["lora", "adalora", "dora", "loha", "hra"]
SCHEDULE_FRACTIONS = {"tinit": 0.1, "tfinal": 0.5, "deltaT": 0.1}


@dataclass
class CompareArgs:
    methods: list[str] | None = None
    model: str | None = None
    data: str | None = None
    out: str = "runs/compare"
    preset: str = "default"
    repeat: int = 1
    seed: int = 42
    with_peft: bool = False
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)  # any preset key, e.g. max_steps
    # memory options passed to every run (TrainArgs fields: frugal.MEMORY_KEYS)
    memory: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # "auto": cuda when available, else cpu (every run trains where the base model is)
    dtype: str | None = None  # the base model's dtype; None keeps the checkpoint's (float32 for the default)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"--device {self.device!r}: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device!r}: CUDA is not available on this machine")
        return device

    def budget(self) -> dict[str, Any]:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        unknown = set(self.overrides) - set(PRESETS[self.preset])
        if unknown:
            raise ValueError(f"unknown budget setting(s) {sorted(unknown)}; known: {sorted(PRESETS[self.preset])}")
        from peftlab.train.args import TrainArgs
        from peftlab.train.frugal import MEMORY_KEYS, validate_memory_args

        bad = set(self.memory) - set(MEMORY_KEYS)
        if bad:
            raise ValueError(f"unknown memory setting(s) {sorted(bad)}; known: {list(MEMORY_KEYS)}")
        validate_memory_args(TrainArgs(device=self.device, dtype=self.dtype, **self.memory))  # before any run
        return {**PRESETS[self.preset], **{k: v for k, v in self.overrides.items() if v is not None}, **self.memory}

    def method_list(self) -> list[str]:
        known = peftlab.variants()
        names = self.methods or (SEED_METHODS if self.preset == "seed000" else sorted(known))
        bad = [m for m in names if m not in known]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {sorted(known)}")
        return names


def _resolve_targets(model, wanted) -> Any:
    """The preset's target names where the model has them, else every linear layer."""
    if isinstance(wanted, str):
        return wanted
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    present = [t for t in wanted if t in names]
    return present if present else "all-linear"


def method_overrides(name: str, budget: dict[str, Any], targets) -> dict[str, Any]:
    """Every shared setting the method's config has a field for (alpha, dropout, schedule lengths)."""
    config = peftlab.variants()[name](targets, budget["r"])
    shared = {"lora_alpha": budget["lora_alpha"], "alpha": budget["lora_alpha"],
              "lora_dropout": budget["lora_dropout"], "total_step": budget["max_steps"]}
    # budget-relative schedules (AdaLoRA's tinit/tfinal/deltaT) scale with the step budget
    shared.update({k: max(1, int(f * budget["max_steps"])) for k, f in SCHEDULE_FRACTIONS.items()})
    return shared_overrides(config, shared)


def kv_prefix_init(name: str, budget: dict[str, Any], targets) -> str | None:
    """The trainer's ``kv_prefix_init`` for this method under the budget: "data" where its adapter is a KV table a
    prefill can set, else None (the method's own init)."""
    mode = budget.get("kv_prefix_init", "method")
    if mode not in KV_PREFIX_INITS:
        raise ValueError(f"kv_prefix_init must be one of {KV_PREFIX_INITS}, got {mode!r}")
    return "data" if mode == "data" and is_kv_table(peftlab.variants()[name](targets, budget["r"])) else None


def environment() -> dict[str, Any]:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peftlab": peftlab.__version__,
           "platform": platform.platform(), "cpu_count": torch.get_num_threads()}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def run_one(backend: str, name: str, base, tokenizer, records, budget, seed, out: Path, progress: bool,
            eval_before: bool = True) -> dict:
    from peftlab.train.frugal import MEMORY_KEYS as memory_keys
    from peftlab.train.loop import TrainArgs, train

    model = copy.deepcopy(base)
    targets = _resolve_targets(model, budget["target_modules"])
    args = TrainArgs(
        method=name, r=budget["r"], target_modules=targets, config_overrides=method_overrides(name, budget, targets),
        out=str(out), max_steps=budget["max_steps"], batch_size=budget["batch_size"], grad_accum=budget["grad_accum"],
        lr=budget["lr"], lr_scheduler=budget["lr_scheduler"], warmup_steps=budget["warmup_steps"],
        max_length=budget["max_length"], eval_size=budget["eval_size"], eval_batch_size=budget["eval_batch_size"],
        seed=seed, progress=progress, log_every=0, eval_before=eval_before,
        kv_prefix_init=kv_prefix_init(name, budget, targets),
        compile=None,  # eager: a short run's time would be mostly compiling, and every method is timed alike
        **{k: budget[k] for k in memory_keys if k in budget},
    )
    attach_fn = None
    if backend == "peft":
        from peftlab.compare.peft_backend import attach_with_peft as attach_fn
    metrics = train(args, model=model, tokenizer=tokenizer, records=records, attach_fn=attach_fn)
    after, before = metrics["eval_after"], metrics["eval_before"]
    return {
        "backend": backend, "method": name, "seed": seed, "config": metrics["config"],
        "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
        "percent_trainable": metrics["trainable_percent"], "effective_lr": metrics["effective_lr"],
        "eval_loss_before": before["loss"] if before else None, "eval_loss": after["loss"],
        "perplexity": math.exp(min(20.0, after["loss"])), "train_time_s": metrics["train_time_s"],
        "tokens_per_s": metrics["tokens_per_s"],
        "peak_memory_mib": (metrics["peak_memory"].get("bytes") or float("nan")) / 2**20,
        "peak_memory_kind": metrics["peak_memory"].get("kind"),
        "losses": [h["loss"] for h in metrics["losses"]], "error": None,
    }


def load_inputs(args: CompareArgs, device: torch.device | None):
    """(base model, tokenizer, records) of a comparison; a bad model or data path raises here."""
    from peftlab.defaults import default_records, load_model_and_tokenizer
    from peftlab.train.data import load_records

    budget = args.budget()
    base, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    base.requires_grad_(False)
    # the default data: one user -> assistant exchange per record, so short sequences still hold a reply
    records = default_records(exchanges=1) if args.data is None else load_records(args.data)
    return base, tokenizer, sample_records(records, budget["train_size"] + budget["eval_size"])


def run_compare(args: CompareArgs, console=None, train: bool = True, jobs: int = 1, inputs: tuple | None = None
                ) -> dict[str, Any]:
    """Train every (seed, method, backend) run not finished earlier in ``args.out`` and write the reports.
    ``jobs``: how many runs train at once (each run records it). ``train=False`` only gathers the finished runs
    (``jobs`` processes trained them, see compare/jobs.py): a run without a record is reported as not finished,
    with its error when it left one. ``inputs``: what
    ``load_inputs`` gave already (a gather needs the base only to describe it, wherever it is)."""
    names = args.method_list()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.resolved_device()
    budget = run_budget(args)
    # a quantized base is quantized onto the GPU by each run from the CPU copy; otherwise it moves once
    base, tokenizer, records = inputs or load_inputs(args, None if budget.get("quantize") else device)
    runs = []
    seeds = [args.seed + i for i in range(args.repeat)]
    for seed in seeds:
        for name in names:
            for backend in _backends(args, name):
                run_dir = _run_dir(out, name, backend, seed)
                done = finished_run(run_dir, budget, args.model, args.data)
                if done is not None:  # an interrupted compare picks up where it stopped
                    runs.append(done)
                    if console is not None:
                        console.print(f"{name} [{backend}] seed {seed}: finished earlier, kept ({run_dir})")
                    continue
                if not train:
                    error = run_dir / RUN_ERROR
                    reason = error.read_text().strip().splitlines()[-1] if error.is_file() else "did not finish"
                    runs.append({"backend": backend, "method": name, "seed": seed, "error": f"not finished: {reason}",
                                 "trainable_params": None, "percent_trainable": None})
                    continue
                if console is not None:
                    console.rule(f"{name} [{backend}] seed {seed}")
                try:
                    # the base model's eval loss is the same for every method of a seed (the split depends
                    # on the seed): measured in that seed's first run only
                    first = not any(r.get("eval_loss_before") is not None and r["seed"] == seed for r in runs)
                    run = run_one(backend, name, base, tokenizer, records, budget, seed, run_dir, args.progress,
                                  eval_before=first)
                    run["jobs"] = jobs  # runs training at once on the device while this one trained
                    record = {"budget": budget, "model": args.model, "data": args.data, "run": run}
                    atomic_write_bytes(run_dir / RUN_RECORD, (json.dumps(record, indent=2) + "\n").encode())
                    runs.append(run)
                except Exception as exc:  # recorded in the results and shown in the table, never dropped
                    runs.append({"backend": backend, "method": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}",
                                 "trainable_params": None, "percent_trainable": None})
                    # and the traceback beside the run (a resumed compare retrains it; several compares sharing one
                    # --out overwrite each other's results.json, not this)
                    run_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(run_dir / RUN_ERROR, traceback.format_exc().encode())
                    if console is not None:
                        console.print(f"[red]{name} [{backend}] failed: {exc}[/]")
    summary = report.summarize(runs)
    results = {
        "schema": "peftlab.compare/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "model": {"name": args.model or "SmolLM2-135M-Instruct (offline default)",
                  "class": type(base).__name__, "parameters": sum(p.numel() for p in base.parameters())},
        "data": {"name": args.data or "chitchat-dataset (offline default)", "records": len(records)},
        "preset": args.preset, "settings": budget, "seeds": seeds, "methods": names, "backends": _backends(args),
        "jobs": jobs,  # runs trained at once on the device: above 1, times and tokens/s are taken under sharing
        "eval_loss_base": {str(r["seed"]): r["eval_loss_before"] for r in runs if r.get("eval_loss_before") is not None},
        "runs": runs, "summary": summary,
        "peft_comparison": report.peft_comparison(summary) if args.with_peft else [],
        "args": asdict(args),
    }
    report.write_reports(results, out)
    return results


def run_budget(args: CompareArgs) -> dict[str, Any]:
    """The preset with its overrides, plus where and in what dtype: in results.json, and a resumed run must
    match them too."""
    return {**args.budget(), "device": args.resolved_device().type, "dtype": args.dtype or "checkpoint"}


def _backends(args: CompareArgs, name: str | None = None) -> list[str]:
    """The backends that train ``name`` (None: the ones asked for): peftlab, and PEFT with ``with_peft`` where PEFT
    has the method."""
    return ["peftlab"] + (["peft"] if args.with_peft and (name is None or _peft_has(name)) else [])


def _run_dir(out: Path, name: str, backend: str, seed: int) -> Path:
    return out / "runs" / f"{name}-{backend}-{seed}"


def unfinished_methods(args: CompareArgs) -> list[str]:
    """The methods with a (seed, backend) run not finished in ``args.out`` yet, in order."""
    budget, out = run_budget(args), Path(args.out)
    return [name for name in args.method_list()
            if any(finished_run(_run_dir(out, name, backend, args.seed + i), budget, args.model, args.data) is None
                   for i in range(args.repeat) for backend in _backends(args, name))]


RUN_RECORD = "run.json"
RUN_ERROR = "error.txt"  # the traceback of a run that failed


def finished_run(run_dir: Path, budget: dict, model: str | None, data: str | None) -> dict | None:
    """The stored result of a run that completed with the same budget, model and data, else None."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged record is retrained, not trusted
    same = record.get("budget") == json.loads(json.dumps(budget)) and record.get("model") == model \
        and record.get("data") == data
    return record["run"] if same else None


def sample_records(records: list[dict], n: int) -> list[dict]:
    """A fixed random subset (seed 0, the same for every method and seed) of at most n records."""
    if len(records) <= n:
        return records
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    return [records[i] for i in sorted(order[:n])]


def _peft_has(name: str) -> bool:
    from peftlab.compare.peft_backend import peft_supports

    return peft_supports(name)
