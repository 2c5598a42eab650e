"""potluck.swarm"""
