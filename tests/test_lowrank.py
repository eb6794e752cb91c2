import pytest
import torch

from peftlab.lowrank import lora_from_delta


def test_exact_for_a_low_rank_update_and_error_matches_the_residual():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(12, 3, generator=g), torch.randn(3, 9, generator=g)
    delta = B @ A
    lr = lora_from_delta(delta, 3)
    torch.testing.assert_close(lr.B @ lr.A, delta, atol=1e-4, rtol=1e-4)
    assert lr.rel_error < 1e-5
    full = torch.randn(12, 9, generator=g)
    lr2 = lora_from_delta(full, 4)
    residual = (full - lr2.B @ lr2.A).norm() / full.norm()
    assert abs(lr2.rel_error - float(residual)) < 1e-5
    assert lr2.A.shape == (4, 9) and lr2.B.shape == (12, 4)


def test_bad_rank_names_the_layer_and_shape():
    with pytest.raises(ValueError, match=r"q_proj: rank 7 .*5x6"):
        lora_from_delta(torch.zeros(5, 6), 7, name="q_proj")
    with pytest.raises(ValueError, match="2-D"):
        lora_from_delta(torch.zeros(5), 1)
