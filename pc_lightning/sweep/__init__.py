"""pc_lightning.sweep"""
