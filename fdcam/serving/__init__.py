"""Serving explanations from Triton Inference Server: `fdcam serve`, and the client of `fdcam explain --server`."""

from .engine import BACKENDS, ServingConfig, handle_image_requests, handle_tensor_requests, make_explainer

__all__ = ["BACKENDS", "ServingConfig", "handle_image_requests", "handle_tensor_requests", "make_explainer"]
