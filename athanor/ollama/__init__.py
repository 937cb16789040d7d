"""Ollama's API on the gateway: the clients that speak only Ollama (VS Code Copilot Chat's Ollama provider, Open
WebUI, Home Assistant, editor plugins) get every model athanor serves, with its swapping, fit and guard.

``routes.py`` says where each path is answered; ``shapes.py`` translates requests and answers to and from the
OpenAI ones the runtimes speak; ``exchange.py`` hands a translated request to the ``/v1`` proxy and its answer back
in Ollama's shape; ``listing.py`` answers tags, ps and show; ``pull.py`` pulls from Hugging Face.
"""
