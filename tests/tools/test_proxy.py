"""The proxy teacher really gets the data's BatchNorm statistics, also through anomalib's TimmFeatureExtractor."""

from __future__ import annotations

import torch
from anomalib.models.components import TimmFeatureExtractor

from anomalib_kd_tools.proxy import calibrate_batchnorm


def test_calibration_reaches_the_batchnorm_inside_timm_feature_extractor() -> None:
    torch.manual_seed(0)
    extractor = TimmFeatureExtractor("resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False)
    images = torch.rand(6, 3, 64, 64) * 3 + 2  # far from zero mean / unit variance
    with torch.no_grad():
        stem = extractor.feature_extractor.conv1(images)
    calibrate_batchnorm(extractor, [images[:3], images[3:]])
    bn1 = extractor.feature_extractor.bn1
    torch.testing.assert_close(bn1.running_mean, stem.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not extractor.feature_extractor.training
    # the features are now normalised by the data's statistics: BN1 output has ~zero mean per channel
    with torch.no_grad():
        out = bn1(stem)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-3 + bn1.bias.abs().max()
