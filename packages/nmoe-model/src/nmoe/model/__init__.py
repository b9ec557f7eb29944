"""nmoe.model"""
