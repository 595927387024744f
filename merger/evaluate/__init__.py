"""Judging a merge: `merger eval` (perplexity per text domain, KL to and agreement with the parents) and
`merger search` (optuna over a recipe's parameters, scored by the same code).

texts.py (built-in and user texts) -> score.py (strided windows on the engine, log-prob streams, tallies)
-> report.py (models x domains, the table, JSON, the demo table); space.py + search.py for the search.
"""
