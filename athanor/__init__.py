"""athanor: a control plane for local model serving."""

__version__ = "0.1.0"
API_VERSION = "athanor.dev/v1alpha1"
