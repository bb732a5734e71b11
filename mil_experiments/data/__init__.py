"""Bag datasets and their LightningDataModules."""
