"""Temperature / L_NM-reduction sweep for MemKD with a BatchNorm-calibrated random-init (proxy) teacher.

Example (the addressing table of docs/memkd.md): ``OMP_NUM_THREADS=1 python benchmarks/memkd_addressing.py
--configs t1.0:mean t0.1:mean t0.1:sum --seeds 0 1 --epochs 20``. Each run prints one JSON row (test AUROCs, logged
train losses and ``MemKD.mechanism_report``) and appends it to ``--out``. Generated data, not MVTec AD.
"""
import argparse, json, math, os, sys, time, warnings, logging
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import torch
from pathlib import Path
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib_kd_tools.synthetic import make_mvtec_like_dataset
from anomalib_kd_tools.proxy import calibrate_batchnorm
from anomalib_memkd import MemKD

p = argparse.ArgumentParser()
p.add_argument("--configs", nargs="+", required=True)  # e.g. t1.0:mean t0.1:sum
p.add_argument("--seeds", nargs="+", type=int, default=[0])
p.add_argument("--size", type=int, default=64)
p.add_argument("--epochs", type=int, default=30)
p.add_argument("--ntrain", type=int, default=40)
p.add_argument("--backbone", default="resnet18")
p.add_argument("--work", default="runs/memkd_addressing")
p.add_argument("--out", default=None)
a = p.parse_args()
work = Path(a.work)
work.mkdir(parents=True, exist_ok=True)
a.out = a.out or str(work / "results.jsonl")

root = work / f"data{a.size}_{a.ntrain}"
if not (root / "widget").exists():
    make_mvtec_like_dataset(root, category="widget", image_size=a.size, n_train=a.ntrain, n_test_good=12,
                            n_test_per_defect=6, defects=("foreign", "tint", "scratch", "stain"), seed=0)

for cfg in a.configs:
    tau, red = cfg.split(":")
    tau = float(tau[1:])
    for seed in a.seeds:
        torch.manual_seed(seed)
        dm = MVTecAD(root=root, category="widget", train_batch_size=8, eval_batch_size=16, num_workers=0, seed=seed)
        dm.setup()
        model = MemKD(backbone=a.backbone, pre_trained=False, temperature=tau, nm_reduction=red,
                      epochs=a.epochs, pre_processor=MemKD.configure_pre_processor(image_size=(a.size, a.size)))
        imgs = torch.cat([b.image for b in dm.train_dataloader()])
        calibrate_batchnorm(model.model.encoder, model.pre_processor.transform(imgs))
        eng = Engine(accelerator="cpu", devices=1, max_epochs=a.epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(work / "run"))
        t0 = time.time()
        eng.fit(model, datamodule=dm)
        fit_s = time.time() - t0
        cm = {k: float(v) for k, v in eng.trainer.callback_metrics.items() if k.startswith("train")}
        res = eng.test(model, datamodule=dm, verbose=False)[0]
        model.eval()
        rep = model.mechanism_report(dm.test_dataloader())
        row = {"tau": tau, "reduction": red, "seed": seed, "size": a.size, "epochs": a.epochs, "fit_s": fit_s,
               "image_AUROC": res.get("image_AUROC"), "pixel_AUROC": res.get("pixel_AUROC"), **cm, **rep}
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
