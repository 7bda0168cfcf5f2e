"""The S3 bucket that holds SQLite snapshots, git objects and the small files needed to rebuild the volume."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra_stack.config import SpotforgeConfig
from infra_stack.nag import acknowledge

BACKUP_PREFIX = "backups/"


class Backups(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: SpotforgeConfig) -> None:
        super().__init__(scope, construct_id)
        retention = Duration.days(config.backup_retention_days)
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            encryption=s3.BucketEncryption.S3_MANAGED,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            versioned=True,
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-backups",
                    enabled=True,
                    expiration=retention,
                    noncurrent_version_expiration=retention,
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                    expired_object_delete_marker=False,
                )
            ],
        )
        acknowledge(
            self.bucket,
            "AwsSolutions-S1",
            "Only the node's role writes here and the bucket is private and TLS-only; server access logs "
            "would need a second bucket and cost more than the backups for a single-user forge.",
        )

    @property
    def prefix(self) -> str:
        return BACKUP_PREFIX
