"""The gateway's HTTP side. Its hot modules run compiled when a current build exists (``athanor.native``)."""

from athanor.native import for_this_process, package_path

HOT_PATH = for_this_process()
__path__ = package_path(__path__, HOT_PATH, "ingress")
