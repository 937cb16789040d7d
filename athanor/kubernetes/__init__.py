"""athanor on Kubernetes: the same desired state rendered as plain manifests (``manifests.py``, names in
``names.py``, YAML in ``output.py``). ``athanor render --target kubernetes`` is the command."""
