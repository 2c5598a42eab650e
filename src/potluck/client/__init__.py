"""potluck.client"""
