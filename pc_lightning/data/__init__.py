"""pc_lightning.data"""
