"""Plots and the PDF report builder; they read run and sweep directories only.

`fedsec.reports.plots`: privacy-utility curves, epsilon spent per round, training curves,
audit bounds, attack grids. `fedsec.reports.pdf`: the report (findings, tables, figures,
the privacy ledger and what the DP guarantee does not cover).
"""
