"""MemKD addressing before and after training: temperature / L_NM-reduction / L_Orth-form sweep, proxy teacher.

Each configuration ``t<tau>:<nm_reduction>[:<orth_form>]`` (e.g. ``t1.0:sum``, the paper; ``t0.1:mean``) is trained
once per seed on generated MVTec-layout data with a random-init teacher whose BatchNorm statistics are calibrated on
the training images (:func:`anomalib_kd_tools.proxy.calibrate_batchnorm`; a proxy, not ImageNet). Per run the
addressing figures of ``anomalib_kd_tools.mechanisms.memkd_mechanism_report`` (per memory m0/m1/m2 = teacher layer1/2/3: peak read weight x L,
entropy / log L, ||F^R - mean v|| / ||F^R||) are measured on the test set three times:

* ``random``: a fresh random ``NRMemory`` of the same L, C and tau read by a random ReLU query of the real query's
  shape (what random keys alone give);
* ``before``: the built model (calibrated teacher, random-init bottleneck / decoder / memories), before any step;
* ``after``: the same model after ``--epochs`` epochs (image / pixel AUROC of its test too).

So learned selectivity (``after`` - ``before``) can be told from initial selectivity (``before`` ~ ``random``).

Example (the before/after table of docs/memkd.md)::

    OMP_NUM_THREADS=1 python benchmarks/memkd_addressing.py --configs t1.0:sum t0.1:mean --seeds 0 1 \
        --backbone wide_resnet50_2 --size 128 --epochs 6 --csv docs/results/memkd_addressing.csv

Each run prints one JSON row (after-training figures unprefixed, ``before_*`` / ``random_*`` beside them) and appends
it to ``--out``; ``--csv`` appends one row per (configuration, seed, phase) to a CSV (header written when the file is
new). Generated data, not MVTec AD.
"""
import argparse, csv, json, math, os, sys, time, warnings, logging
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import torch
from pathlib import Path
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib_kd_tools.synthetic import make_mvtec_like_dataset
from anomalib_kd_tools.mechanisms import memkd_mechanism_report
from anomalib_kd_tools.proxy import calibrate_batchnorm
from anomalib_memkd import MemKD, NRMemory

#: the addressing figures (mechanism_report keys without the _m{index} suffix) that the CSV keeps
FIGURES = ("peak_over_uniform", "entropy_ratio", "recall_dev")
CSV_COLUMNS = ["tau", "nm_reduction", "orth_form", "seed", "phase", "backbone", "size", "epochs", "steps", "batch",
               "exemplars", "ntrain", *(f"{name}_m{m}" for name in FIGURES for m in range(3)), "image_AUROC",
               "pixel_AUROC", "train_kd", "train_nm_mean", "train_nm_sum", "train_orth", "fit_s", "date", "hardware"]


def parse_config(text: str) -> tuple[float, str, str]:
    """``t<tau>:<nm_reduction>[:<orth_form>]`` -> (tau, nm_reduction, orth_form); the orth form defaults to abs."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].startswith("t"):
        raise SystemExit(f"bad --configs entry {text!r}: expected t<tau>:<sum|mean>[:<abs|signed|distance>]")
    return float(parts[0][1:]), parts[1], parts[2] if len(parts) == 3 else "abs"


@torch.no_grad()
def random_reference(model: MemKD, images: torch.Tensor, seed: int) -> dict[str, float]:
    """Addressing of fresh random memories (same L, C, tau) read by random ReLU queries of the real queries' shapes."""
    queries = model.model.memory_queries(images)
    generator = torch.Generator().manual_seed(10_000 + seed)
    report: dict[str, float] = {}
    for index, (memory, query) in enumerate(zip(model.model.memories, queries, strict=True)):
        fresh = NRMemory(memory.num_items, memory.channels, memory.temperature)
        fresh.keys.copy_(torch.randn(fresh.keys.shape, generator=generator))
        fresh.values.copy_(torch.randn(fresh.values.shape, generator=generator))
        statistics = fresh.addressing_statistics(torch.randn(query.shape, generator=generator).relu())
        report[f"peak_over_uniform_m{index}"] = float(statistics["peak"].double().mean()) * memory.num_items
        report[f"entropy_ratio_m{index}"] = float(statistics["entropy_ratio"].double().mean())
        report[f"recall_dev_m{index}"] = float(statistics["recall_dev"].double().mean())
    return report


def hardware() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} thread(s), no GPU" if not torch.cuda.is_available() else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--configs", nargs="+", required=True, help="t<tau>:<sum|mean>[:<abs|signed|distance>]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ntrain", type=int, default=40)
    p.add_argument("--n-test-good", type=int, default=12)
    p.add_argument("--n-test-per-defect", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--exemplars", type=int, default=16, help="N exemplars per step (the paper's 16)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--work", default="runs/memkd_addressing")
    p.add_argument("--out", default=None, help="JSON lines, one per run (default: <work>/results.jsonl)")
    p.add_argument("--csv", default=None, help="append one row per (configuration, seed, phase) to this CSV")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    a.out = a.out or str(work / "results.jsonl")
    configs = [parse_config(text) for text in a.configs]
    date = time.strftime("%Y-%m-%d")
    machine = hardware()

    root = work / f"data{a.size}_{a.ntrain}_{a.n_test_good}_{a.n_test_per_defect}"
    if not (root / "widget").exists():
        make_mvtec_like_dataset(root, category="widget", image_size=a.size, n_train=a.ntrain,
                                n_test_good=a.n_test_good, n_test_per_defect=a.n_test_per_defect,
                                defects=("foreign", "tint", "scratch", "stain"), seed=0)

    for tau, red, orth in configs:
        for seed in a.seeds:
            torch.manual_seed(seed)
            dm = MVTecAD(root=root, category="widget", train_batch_size=a.batch, eval_batch_size=16, num_workers=0,
                         seed=seed)
            dm.setup()
            model = MemKD(backbone=a.backbone, pre_trained=False, temperature=tau, nm_reduction=red, orth_form=orth,
                          num_exemplars=a.exemplars, epochs=a.epochs,
                          pre_processor=MemKD.configure_pre_processor(image_size=(a.size, a.size)))
            imgs = torch.cat([b.image for b in dm.train_dataloader()])
            calibrate_batchnorm(model.model.encoder, model.pre_processor.transform(imgs))
            model.eval()
            test_images = torch.cat([b.image for b in dm.test_dataloader()])
            rand = random_reference(model, model.pre_processor.transform(test_images), seed)
            before = memkd_mechanism_report(model, dm.test_dataloader())
            model.train()  # Lightning keeps the mode it is given
            # validation (thresholds for the test) once, after the last epoch
            eng = Engine(accelerator="cpu", devices=1, max_epochs=a.epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(work / "run"),
                         check_val_every_n_epoch=a.epochs)
            t0 = time.time()
            eng.fit(model, datamodule=dm)
            fit_s = time.time() - t0
            steps = int(eng.trainer.global_step)
            cm = {k: float(v) for k, v in eng.trainer.callback_metrics.items() if k.startswith("train")}
            res = eng.test(model, datamodule=dm, verbose=False)[0]
            model.eval()
            rep = memkd_mechanism_report(model, dm.test_dataloader())
            row = {"tau": tau, "reduction": red, "orth_form": orth, "seed": seed, "size": a.size, "epochs": a.epochs,
                   "steps": steps, "backbone": a.backbone, "fit_s": fit_s, "image_AUROC": res.get("image_AUROC"),
                   "pixel_AUROC": res.get("pixel_AUROC"), **cm, **rep,
                   **{f"before_{k}": v for k, v in before.items()}, **{f"random_{k}": v for k, v in rand.items()}}
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            if a.csv:
                common = {"tau": tau, "nm_reduction": red, "orth_form": orth, "seed": seed, "backbone": a.backbone,
                          "size": a.size, "epochs": a.epochs, "batch": a.batch, "exemplars": a.exemplars,
                          "ntrain": a.ntrain, "date": date, "hardware": machine}
                trained = {"image_AUROC": res.get("image_AUROC"), "pixel_AUROC": res.get("pixel_AUROC"),
                           "train_kd": cm.get("train/kd"), "train_nm_mean": cm.get("train/nm_mean"),
                           "train_nm_sum": cm.get("train/nm_sum"), "train_orth": cm.get("train/orth")}
                trained = {key: None if value is None else round(float(value), 4) for key, value in trained.items()}
                trained.update(steps=steps, fit_s=round(fit_s, 1))
                path = Path(a.csv)
                new = not path.exists() or path.stat().st_size == 0
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                    if new:
                        writer.writeheader()
                    for phase, figures, extra in (("random", rand, {"steps": 0}), ("before", before, {"steps": 0}),
                                                  ("after", rep, trained)):
                        values = {key: round(figures[key], 4) for key in CSV_COLUMNS if key in figures}
                        writer.writerow({**common, "phase": phase, **extra, **values})
    return 0


if __name__ == "__main__":
    sys.exit(main())
