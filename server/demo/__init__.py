"""`loraplex demo` and `loraplex demo-model`: the embedded demo model and its adapters, end to end."""
