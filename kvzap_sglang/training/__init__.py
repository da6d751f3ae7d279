"""Surrogate training: offline corpus -> KVzip+ oracle targets -> Ridge / MLP fit -> held-out R².

``corpus`` builds the prompts, ``collect`` runs the oracle and samples positions (cached on disk), ``fit``
trains the two surrogate kinds, ``metrics`` scores them, ``pipeline`` ties them together for the CLI.
"""
