"""Recipes that build qtutor's embedded default model, ``qtutor-tiny``.

``corpus`` assembles a public-domain English corpus from Debian packages and
trains the tokenizer (``tokenizer``); ``train`` trains the model on a GPU.
See ``README.md`` in this folder for the full procedure.
"""
