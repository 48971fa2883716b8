"""Distributed (DDP) training of AAND and MemKD: a real 2-process fit on CPU (gloo), plus unit tests.

The 2-process runs go through ``tests/base/ddp_fit.py`` in a subprocess (Lightning's ``strategy="ddp"`` re-launches
the running script for rank 1, which must not be pytest). The run fits, tests and exports; the tests here check
what it left behind and recompute the metrics in this single process from the checkpoint.

The test set has 11 images: odd, so Lightning's ``DistributedSampler`` pads it with a repeated image. The eval
batch size is 3 so that no image is ever scored in a batch of one, neither on a rank nor in one process: on CPU
a batch of one takes other kernels whose results differ in the last bit, and the F1-adaptive threshold sits
exactly on a validation image's score, so such a bit would flip that image's label in the comparison.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.engine import Engine
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler

from anomalib_kd_base.distributed import RNGStream, padded_positions_to_drop, rank_seed, select_batch_
from ddp_fit import CATEGORY, EvalRecorder, build_datamodule, build_model

SCRIPT = Path(__file__).with_name("ddp_fit.py")
TEST_IMAGES = 11  # 5 good + 3 defect types x 2
TRAINED_PREFIXES = {
    "aand": ("model.raa.", "model.bottleneck.", "model.decoder."),
    "memkd": ("model.memories.", "model.bottleneck.", "model.decoder."),
}
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_dataset(make_dataset) -> Path:
    return make_dataset("ddp", n_train=8, n_test_good=5, n_test_per_defect=2)


@pytest.fixture(scope="module", params=["aand", "memkd"])
def ddp_run(request, ddp_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-process DDP fit + test + export of the model; what both ranks wrote."""
    name = request.param
    out = tmp_path_factory.mktemp(f"ddp_{name}")
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), HF_HUB_OFFLINE="1")
    proc = subprocess.run(  # noqa: S603
        [sys.executable, str(SCRIPT), name, str(ddp_dataset), str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"DDP run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return {"name": name, "out": out, "data": ddp_dataset, "ranks": ranks}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---------------------------------------------------------------------------------------------- 2-process runs
@pytest.mark.integration
def test_ddp_fit_trains_identical_replicas(ddp_run) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["backend"] == "gloo"
    assert rank0["state"].keys() == rank1["state"].keys()
    different = [key for key in rank0["state"] if not torch.equal(rank0["state"][key], rank1["state"][key])]
    assert different == []  # parameters and buffers (BatchNorm statistics, thresholds) alike
    for prefix in TRAINED_PREFIXES[ddp_run["name"]]:
        keys = [key for key in rank0["state"] if key.startswith(prefix)]
        assert keys
        assert any(not torch.equal(rank0["state"][key], rank0["initial"][key]) for key in keys), prefix
    teacher = [key for key in rank0["state"] if key.startswith("model.encoder.")]
    assert teacher
    assert all(torch.equal(rank0["state"][key], rank0["initial"][key]) for key in teacher)


@pytest.mark.integration
def test_ddp_only_rank_zero_writes(ddp_run) -> None:
    out = ddp_run["out"]
    rank0, rank1 = ddp_run["ranks"]
    checkpoint = Path(rank0["checkpoint"])
    assert rank1["checkpoint"] == rank0["checkpoint"]
    assert checkpoint.is_file()
    assert [path.name for path in checkpoint.parent.iterdir()] == [checkpoint.name]
    saves = _lines(out / "saves_rank0.txt")
    assert saves
    assert set(saves) == {str(checkpoint)}
    assert not (out / "saves_rank1.txt").exists()
    # the exported model: written by rank 0 once, the same path returned on both ranks
    assert _lines(out / "exports_rank0.txt") == ["torch"]
    assert not (out / "exports_rank1.txt").exists()
    assert rank0["exported"] == rank1["exported"]
    assert Path(rank0["exported"]).is_file()
    # one results folder for the run, shared by both ranks, `latest` pointing at it
    run_root = Path(rank0["default_root_dir"])
    assert rank1["default_root_dir"] == rank0["default_root_dir"]
    versions = sorted(path.name for path in run_root.parent.iterdir() if path.name != "latest")
    assert versions == [run_root.name]
    assert (run_root.parent / "latest").resolve() == run_root.resolve()
    images = list((run_root / "images").rglob("*.png"))
    assert len(images) == TEST_IMAGES  # both ranks' test visualisations, in the same folder


@pytest.mark.integration
def test_ddp_ranks_draw_their_own_random_streams(ddp_run) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert rank0["draws"]
    assert len(rank0["draws"]) == len(rank1["draws"])
    assert rank0["draws"] != rank1["draws"]  # synthetic anomalies (AAND) / exemplars (MemKD) differ per rank
    assert rank0["stream_seed_cleared"] and rank1["stream_seed_cleared"]  # back to the global RNG after fit


@pytest.mark.integration
def test_ddp_evaluates_each_image_once(ddp_run) -> None:
    rank0, rank1 = ddp_run["ranks"]
    test_paths = rank0["evaluated"]["test"] + rank1["evaluated"]["test"]
    assert len(test_paths) == TEST_IMAGES
    assert len(set(test_paths)) == TEST_IMAGES
    assert {len(rank0["evaluated"]["test"]), len(rank1["evaluated"]["test"])} == {5, 6}  # the repeat was dropped
    val_counts = collections.Counter(rank0["evaluated"]["validate"] + rank1["evaluated"]["validate"])
    assert len(val_counts) == TEST_IMAGES  # anomalib validates on the test images
    assert set(val_counts.values()) == {2}  # once per epoch, two epochs


@pytest.mark.integration
def test_ddp_metrics_equal_single_process_from_checkpoint(ddp_run, tmp_path: Path) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert rank0["test"] == rank1["test"]
    checkpoint = rank0["checkpoint"]
    ddp_scores = {stage: {**rank0["scores"][stage], **rank1["scores"][stage]} for stage in ("validate", "test")}
    assert len(ddp_scores["test"]) == TEST_IMAGES
    # both ranks validated the final weights with rank 0's BatchNorm statistics: the same scores as the test
    for path, score in ddp_scores["test"].items():
        assert ddp_scores["validate"][path] == pytest.approx(score, abs=1e-6), path

    def single_engine(name: str, recorder: EvalRecorder) -> Engine:
        return Engine(
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp_path / name,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[recorder],
        )

    # validation in one process recomputes the thresholds / normalisation the DDP validation stored
    model, recorder = build_model(ddp_run["name"]), EvalRecorder()
    single_engine("validate", recorder).validate(
        model,
        datamodule=build_datamodule(ddp_run["data"]),
        ckpt_path=checkpoint,
    )
    assert recorder.scores["validate"].keys() == ddp_scores["validate"].keys()
    for path, score in recorder.scores["validate"].items():
        assert ddp_scores["validate"][path] == pytest.approx(score, abs=1e-5), path
    post = {key: value for key, value in model.state_dict().items() if key.startswith("post_processor.")}
    assert post
    for key, value in post.items():
        torch.testing.assert_close(value, rank0["state"][key], rtol=0, atol=1e-5, msg=key)

    model, recorder = build_model(ddp_run["name"]), EvalRecorder()
    single = single_engine("test", recorder).test(
        model,
        datamodule=build_datamodule(ddp_run["data"]),
        ckpt_path=checkpoint,
    )
    assert recorder.scores["test"].keys() == ddp_scores["test"].keys()
    for path, score in recorder.scores["test"].items():
        assert ddp_scores["test"][path] == pytest.approx(score, abs=1e-5), path
    state = model.state_dict()
    assert all(torch.equal(state[key], rank0["state"][key]) for key in rank0["state"])
    assert len(single) == len(rank0["test"]) == 1
    assert single[0].keys() == rank0["test"][0].keys()
    assert {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"} <= single[0].keys()
    # The F1-adaptive image threshold is one of the validation scores, and anomalib validates on the test images: the
    # image scored at the threshold gets its label from float rounding (DDP and one process score it ~1e-7 apart,
    # different batch compositions), so image F1 is compared only when no test score lies at the threshold. Every
    # other image's label must agree.
    threshold = float(rank0["state"]["post_processor._image_threshold"])
    at_threshold = {path for path, score in ddp_scores["test"].items() if abs(score - threshold) <= 1e-5}
    assert len(at_threshold) <= 1
    for path, score in recorder.scores["test"].items():
        if path not in at_threshold:
            assert (score >= threshold) == (ddp_scores["test"][path] >= threshold), path
    for key, value in rank0["test"][0].items():
        if key == "image_F1Score" and at_threshold:
            continue
        assert single[0][key] == pytest.approx(value, abs=1e-6), key


# ---------------------------------------------------------------------------------------------- units
def test_rank_seed_is_distinct_per_rank_and_reproducible() -> None:
    seeds = [rank_seed(1234, rank) for rank in range(8)]
    assert len(set(seeds)) == 8
    assert seeds == [rank_seed(1234, rank) for rank in range(8)]
    assert rank_seed(1235, 0) not in seeds
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_rng_stream_is_private_and_continuous() -> None:
    torch.manual_seed(7)
    expected_global = torch.rand(3)
    torch.manual_seed(7)
    stream = RNGStream(rank_seed(5, 0))
    with stream.activate():
        first = torch.rand(2)
    assert torch.equal(torch.rand(3), expected_global)  # the global generator did not move
    with stream.activate():
        second = torch.rand(2)
    with RNGStream(rank_seed(5, 0)).activate():
        both = torch.rand(4)
    assert torch.equal(torch.cat([first, second]), both)  # the stream continues across activations
    with RNGStream(rank_seed(5, 1)).activate():
        assert not torch.equal(torch.rand(4), both)


def _synthesise(model, base_seed: int, rank: int) -> torch.Tensor:
    model.kd_random.start(rank_seed(base_seed, rank))  # what fit start does
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with model.kd_random.activate(images.device):
        _, masks, _ = model.synthesizer(images)
    return masks


def test_aand_synthesis_stream_per_rank() -> None:
    model = build_model("aand")
    torch.manual_seed(0)
    rank0 = _synthesise(model, 99, 0)
    torch.manual_seed(1)  # the global RNG does not matter during fit
    rank0_again = _synthesise(model, 99, 0)
    rank1 = _synthesise(model, 99, 1)
    assert rank0.sum() > 0
    assert torch.equal(rank0, rank0_again)
    assert not torch.equal(rank0, rank1)
    model.kd_random.stop()  # what fit end does
    torch.manual_seed(3)
    outside = model.synthesizer(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))[1]
    torch.manual_seed(3)
    assert torch.equal(outside, model.synthesizer(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))[1])


def test_memkd_exemplar_stream_per_rank(ddp_dataset: Path) -> None:
    model = build_model("memkd")
    datamodule = build_datamodule(ddp_dataset)
    datamodule.setup("fit")
    model._trainer = SimpleNamespace(datamodule=datamodule)  # noqa: SLF001

    def draws(rank: int) -> list[str]:
        model.kd_random.start(rank_seed(42, rank))
        iterator = model._build_exemplar_iterator()  # noqa: SLF001
        return [path for _ in range(4) for path in next(iterator).image_path]

    torch.manual_seed(0)
    rank0 = draws(0)
    torch.manual_seed(1)
    assert draws(0) == rank0
    assert draws(1) != rank0
    assert all(CATEGORY in path for path in rank0)


def test_padded_positions_are_each_kept_once() -> None:
    """Simulate Lightning's eval sampler on every rank: the kept samples are the data set, each once."""
    for num_samples in range(1, 24):
        for replicas in (2, 3, 4):
            for batch_size in (1, 2, 3, 5):
                drop = padded_positions_to_drop(num_samples, replicas, batch_size)
                kept, empty_batch = [], False
                for rank in range(replicas):
                    sampler = DistributedSampler(range(num_samples), num_replicas=replicas, rank=rank, shuffle=False)
                    seen = 0
                    for batch in BatchSampler(sampler, batch_size, drop_last=False):
                        keep = [idx for i, idx in enumerate(batch) if rank + (seen + i) * replicas not in drop]
                        empty_batch |= not keep
                        kept += keep
                        seen += len(batch)
                case = (num_samples, replicas, batch_size)
                if batch_size > 1 and num_samples >= replicas:
                    assert not empty_batch, case
                    assert sorted(kept) == list(range(num_samples)), case
                elif not empty_batch:
                    assert sorted(kept) == list(range(num_samples)), case
    assert padded_positions_to_drop(6, 2, 3) == frozenset()
    assert padded_positions_to_drop(5, 2, None) == frozenset({5})


def test_a_nested_export_under_ddp_waits_at_one_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    """anomalib's ``to_openvino`` calls ``self.to_onnx``: under DDP only rank 0 is inside, so the nested export runs
    directly. A second barrier there would never be met by the other ranks (a hang, before the fix)."""
    from anomalib_kd_base import distributed

    calls: list[str] = []
    strategy = SimpleNamespace(barrier=lambda name: calls.append("barrier"),
                               broadcast=lambda obj, src=0: calls.append("broadcast") or obj)  # fmt: skip
    trainer = SimpleNamespace(world_size=2, is_global_zero=True, strategy=strategy)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    def to_onnx() -> str:
        calls.append("onnx")
        return "model.onnx"

    def to_openvino() -> str:
        calls.append("openvino")
        assert distributed.run_on_rank_zero(trainer, to_onnx) == "model.onnx"
        return "model.xml"

    assert distributed.run_on_rank_zero(trainer, to_openvino) == "model.xml"
    assert calls == ["openvino", "onnx", "barrier", "broadcast"]
    calls.clear()
    trainer.is_global_zero = False  # another rank exports nothing, waits once and gets rank 0's result
    assert distributed.run_on_rank_zero(trainer, to_openvino) is None
    assert calls == ["barrier", "broadcast"]


def test_select_batch_keeps_rows_in_place() -> None:
    batch = ImageBatch(
        image=torch.rand(3, 3, 8, 8),
        gt_label=torch.tensor([0, 1, 1]),
        gt_mask=torch.zeros(3, 8, 8, dtype=torch.bool),
        image_path=["a.png", "b.png", "c.png"],
    )
    image = batch.image.clone()
    result = select_batch_(batch, torch.tensor([True, False, True]))
    assert result is batch
    assert batch.image_path == ["a.png", "c.png"]
    assert torch.equal(batch.image, image[[0, 2]])
    assert batch.gt_label.tolist() == [0, 1]
    assert batch.gt_mask.shape == (2, 8, 8)


@pytest.mark.parametrize(("name", "find_unused"), [("aand", True), ("memkd", False)])
def test_setup_prepares_ddp_wrapping(name: str, find_unused: bool) -> None:
    """``setup("fit")`` (before DDP wraps the module) freezes what never trains; fit start checks the DDP wrapper.

    anomalib's Engine names the strategy ``ddp_find_unused_parameters_true`` for AAND (tests/base/test_upstream.py;
    the 2-process runs above go through it); a wrapper without ``find_unused_parameters`` is refused, with the fix.
    """
    from anomalib_kd_base.distributed import DistributedTraining

    model = build_model(name)
    if name == "aand":
        model._set_trainable(2)  # noqa: SLF001 - as after a first fit: RAA frozen
    assert model.ddp_find_unused_parameters is find_unused
    callback = next(c for c in model.configure_callbacks() if isinstance(c, DistributedTraining))
    callback.setup(SimpleNamespace(world_size=1), model, "fit")
    assert not any(param.requires_grad for param in model.model.encoder.parameters())
    for unused in (model.model.bottleneck.conv4, model.model.bottleneck.bn4):
        assert not any(param.requires_grad for param in unused.parameters())
    trained = [model.model.bottleneck.conv1, model.model.decoder]
    trained.append(model.model.raa if name == "aand" else model.model.memories)
    assert all(param.requires_grad for module in trained for param in module.parameters())

    wrapped = DistributedDataParallel.__new__(DistributedDataParallel)  # what strategy.setup leaves at fit start
    wrapped.__dict__["find_unused_parameters"] = False
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped))
    if find_unused:
        with pytest.raises(ValueError, match=r"part .* --trainer\.strategy ddp_find_unused_parameters_true"):
            callback.on_fit_start(trainer, model)
    else:
        callback.on_fit_start(trainer, model)
    wrapped.__dict__["find_unused_parameters"] = True
    callback.on_fit_start(trainer, model)
