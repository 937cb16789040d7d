"""The gateway's HTTP side. Its hot modules run compiled when a current build exists (``athanor.native``)."""

from athanor.native import hot_path, package_path

HOT_PATH = hot_path()
__path__ = package_path(__path__, HOT_PATH)
