import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
    """A small generated benchmark shared by the tests that only read it."""
    from htc_vlm.data.scenes import write_benchmark
    from htc_vlm.data.tokenizer import save_tokenizer

    out = tmp_path_factory.mktemp("scenes")
    write_benchmark(out, 60, 20, seed=3, image_size=64)
    save_tokenizer(out / "tokenizer")
    return out
