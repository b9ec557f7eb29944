"""nmoe.rdep"""
