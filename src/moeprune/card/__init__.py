"""The model card: numbers computed from artifacts, a Jinja template, plots.

- :mod:`moeprune.card.source`: where the inputs live (run directory or published artifact).
- :mod:`moeprune.card.numbers`: every number the card shows, with its source.
- :mod:`moeprune.card.plots`: the PNG figures.
- :mod:`moeprune.card.render`: ``ModelCard.from_template`` rendering and the ``invoke card`` stage.
"""
