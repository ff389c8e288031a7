"""Plots and (to come) the PDF report builder; they read run and sweep directories only.

`reports.plots`: privacy-utility curves, epsilon spent per round, training curves.
"""
