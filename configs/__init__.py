"""Built-in recipes (YAML), installed as quantkit.configs."""
