"""peftlab: parameter-efficient fine-tuning beyond plain LoRA, in PEFT's checkpoint format."""
from peftlab.core.adapter import AdaptedModule, AdapterError, AdapterLayer
from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.input_side import call_inputs
from peftlab.core.inject import (
    adapter_layers, attach, count_parameters, delete_adapter, disabled, find_targets, set_active,
)
from peftlab.core.merge import merge, merge_and_unload, unmerge
from peftlab.core.registry import config_from_dict, lookup, methods, register, variants
from peftlab.core.state import CheckpointError, load_adapter, read_config, save_adapter
from peftlab.corda import corda_components, corda_init
from peftlab.eva import eva_components, eva_init
from peftlab.methods.lora import LoraConfig
from peftlab.train.optim import create_loraplus_optimizer

__version__ = "0.1.0"


def list_adapters(model):
    """Names of the adapters attached to ``model``."""
    from peftlab.core.inject import model_state

    return list(model_state(model).configs)


def __getattr__(name: str):
    """``peftlab.<Name>Config`` for every registered method (LoHaConfig, VeraConfig, ...)."""
    if name.endswith("Config"):
        from peftlab.core.registry import methods as registered  # `peftlab.methods` is also the subpackage

        for method in registered().values():
            if method.config.__name__ == name:
                return method.config
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
