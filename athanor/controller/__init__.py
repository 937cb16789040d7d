"""The controller: desired state against running runtimes. The modules a proxied request passes through run
compiled when a current build exists (``athanor.native``)."""

from athanor.native import for_this_process, package_path

__path__ = package_path(__path__, for_this_process(), "controller")
