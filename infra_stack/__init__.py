"""The spotforge CDK app: one construct per concern, wired together by SpotforgeStack."""
