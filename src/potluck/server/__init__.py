"""potluck.server"""
