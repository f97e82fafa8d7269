"""Sphinx configuration: `python -m sphinx -W -b html docs docs/_build`."""

import os
import sys

sys.path.insert(0, os.path.abspath('..'))

project = 'frog_optax'
author = 'frog_optax authors'
copyright = '2026, frog_optax authors'  # noqa: A001

extensions = [
  'myst_parser',
  'sphinx.ext.autodoc',
  'sphinx.ext.autosummary',
  'sphinx.ext.napoleon',
  'sphinx.ext.mathjax',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
exclude_patterns = ['_build']
myst_heading_anchors = 3
myst_enable_extensions = ['dollarmath']
autosummary_generate = True
templates_path = ['_templates']
autodoc_typehints = 'description'
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
html_theme = 'alabaster'
# Figures live beside the results they are drawn from, outside docs/.
suppress_warnings = ['myst.xref_missing']
