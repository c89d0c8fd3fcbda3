"""Model zoo: CIFAR ResNets, MobileNetV1, DenseNet-BC, VGG-16-BN, ViTs for 32x32 images and ImageNet ResNets.

Importing this package registers every model; build one with ``create_model(name, **kwargs)``, and a
compact one (channels removed) with ``rebuild(name, kwargs, shapes)``.
"""

# Importing the model modules registers their factories.
from sparsetrain.models import cifar_resnet, densenet, imagenet_resnet, mobilenet, vgg, vit  # noqa: F401
from sparsetrain.models.registry import (
    ModelSpec,
    create_model,
    input_size,
    list_models,
    model_spec,
    rebuild,
    register_model,
)

__all__ = ["ModelSpec", "create_model", "input_size", "list_models", "model_spec", "rebuild", "register_model"]
