"""nmoe.data"""
