"""Plots and the PDF report builder; reads run directories only.

Empty until the reports issue lands.
"""
