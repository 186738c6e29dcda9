import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (every fx_bk module is one more Dynamo cache entry)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _global_state_left_alone():
    """A test that leaves autocast on or grad mode off fails here, by name (and the state is put
    back), instead of changing the dtypes of whatever test runs next in the same process."""
    yield
    leaked = {kind: torch.get_autocast_dtype(kind) for kind in ("cpu", "cuda")
              if torch.is_autocast_enabled(kind)}
    grad = torch.is_grad_enabled()
    for kind in leaked:
        torch.set_autocast_enabled(kind, False)
    torch.set_grad_enabled(True)
    assert not leaked and grad, f"autocast left on {leaked}, grad mode {grad}"


# Compiled variants that repeat what a kept variant already checks (same model, the other
# reduction or bound; the eager run of the same model), kept out of CI as `slow` so the suite
# stays under 20 minutes on 2 cores: `python -m pytest -m slow` runs them.
COVERED_ELSEWHERE = (
    "test_oracles.py::test_compiled_matches_vmap_oracle[resnet_gn-sum-1000.0]",
    "test_oracles.py::test_compiled_matches_vmap_oracle[resnet_gn-sum-0.001]",
    "test_oracles.py::test_compiled_matches_vmap_oracle[resnet_gn-mean-1000.0]",
    "test_oracles.py::test_compiled_matches_vmap_oracle[resnet_gn-mean-0.001]",  # CNNs compiled:
    # test_zoo's convnext_like and resnetv2_stdconv_like
    "test_oracles.py::test_compiled_matches_vmap_oracle[transformer-sum-0.001]",
    "test_oracles.py::test_compiled_matches_vmap_oracle[transformer-sum-1000.0]",
    "test_oracles.py::test_compiled_matches_vmap_oracle[transformer-mean-1000.0]",
    "test_hf_models.py::test_hf_model_matches_per_sample_loop[compiled-bert]",
    "test_hf_models.py::test_hf_model_matches_per_sample_loop[compiled-vit]",
    "test_hf_models.py::test_model_computing_its_own_loss_from_labels[compiled-bert]",
    "test_hf_models.py::test_model_computing_its_own_loss_from_labels[compiled-gpt2]",
)
# float32 without clipping (R = 1000) repeats the float64 case's structure; float32 with
# clipping (R = 0.001) keeps the precision check
COVERED_BY_PATTERN = ("test_oracles.py::test_eager_matches_vmap_oracle[", "-f32-", "-1000.0]")


def pytest_collection_modifyitems(items):
    for item in items:
        node = item.nodeid.split("/")[-1]
        if node in COVERED_ELSEWHERE or all(part in node for part in COVERED_BY_PATTERN):
            item.add_marker(pytest.mark.slow)
