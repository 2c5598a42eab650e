"""potluck.wire"""
