"""nmoe.metrics"""
