"""The Triton model repository shipped with llmesh (one folder per model: ``config.pbtxt`` +
``1/model.py``). Installed as package data so a wheel carries it; the launcher finds it with
``importlib.resources`` and points tritonserver at it. Triton itself never imports this file."""
