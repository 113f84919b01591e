"""Serving the tuned model: an MLflow pyfunc model in the registry, and a web page (issue 15).

``engine`` (one loaded prior + decoder, request checks), ``images`` (uploads and PNGs),
``pyfunc`` + ``mlflow_model`` (the MLflow model), ``register`` (the DVC stage's work),
``studio`` + ``page`` + ``web`` (``fashiondiff serve``: the page).
"""
