"""potluck.models"""
