"""potluck.cli"""
