"""pc_lightning.modules"""
