"""``python -m fx_bk.rules``: print the supported-op table (README.md's, between its markers)."""

from fx_bk.rules import supported_ops_table

print(supported_ops_table())
