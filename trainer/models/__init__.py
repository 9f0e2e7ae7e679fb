"""Model registry (timm-style) and the CIFAR/MNIST architectures of LBGAT, TRADES, CAT and RAAT.

>>> from trainer.models import create_model, list_models
>>> model = create_model("wrn34_10", num_classes=100)
>>> list_models("wrn34*")
['wrn34_10', 'wrn34_20']

All models take NCHW inputs in [0, 1] and pool adaptively before the classifier; with
``create_model(..., normalize="cifar10")`` a classifier standardises its inputs itself (``normalize.py``).
Importing this package registers every architecture below.
"""

from . import cat_mask, inception_resnet_v2, normalize, preact_resnet, resnet, small_cnn, wide_resnet
from ._registry import count_flops, create_model, list_models, model_kind, register_model

__all__ = [
    "cat_mask",
    "count_flops",
    "create_model",
    "inception_resnet_v2",
    "list_models",
    "model_kind",
    "normalize",
    "preact_resnet",
    "register_model",
    "resnet",
    "small_cnn",
    "wide_resnet",
]
