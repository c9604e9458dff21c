"""pc_lightning.callbacks"""
