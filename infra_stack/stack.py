"""SpotforgeStack wires the constructs together; each concern lives in its own module."""

from __future__ import annotations

from typing import Any

from aws_cdk import CfnOutput, Stack, Tags
from constructs import Construct

from infra_stack.alerts import Alerts
from infra_stack.backups import Backups
from infra_stack.config import SpotforgeConfig
from infra_stack.controller import Controller, ControllerInputs
from infra_stack.data import DataVolume, PublicAddress
from infra_stack.fis import SpotInterruptionDrill
from infra_stack.network import Network
from infra_stack.node import NodeTemplate
from infra_stack.observability import Observability

STACK_TAG = "spotforge:stack"


class SpotforgeStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: SpotforgeConfig, **kwargs: Any
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description="spotforge: self-healing Forgejo on one spot instance",
            **kwargs,
        )
        self.config = config
        Tags.of(self).add(STACK_TAG, config.stack_name)

        self.network = Network(self, "Network", config=config)
        first_subnet = self.network.vpc.public_subnets[0]
        self.data = DataVolume(self, "Data", config=config, availability_zone=first_subnet.availability_zone)
        self.address = PublicAddress(self, "Address", config=config)
        self.backups = Backups(self, "Backups", config=config)
        self.alerts = Alerts(self, "Alerts", config=config)
        self.node_template = NodeTemplate(
            self,
            "Node",
            config=config,
            security_group=self.network.security_group,
            bucket=self.backups.bucket,
            backup_prefix=self.backups.prefix,
            volume_id=self.data.volume.volume_id,
            allocation_id=self.address.allocation_id,
            public_ip=self.address.public_ip,
        )
        self.controller = Controller(
            self,
            "Controller",
            config=config,
            inputs=ControllerInputs(
                vpc=self.network.vpc,
                spot_template=self.node_template.spot_template,
                on_demand_template=self.node_template.on_demand_template,
                node_role=self.node_template.role,
                volume_id=self.data.volume.volume_id,
                allocation_id=self.address.allocation_id,
                bucket_name=self.backups.bucket.bucket_name,
                bucket_arn=self.backups.bucket.bucket_arn,
                topic_arn=self.alerts.topic.topic_arn,
                topic_key_arn=self.alerts.key.key_arn,
            ),
        )
        self.observability = Observability(
            self, "Observability", config=config, topic=self.alerts.topic, functions=self.controller.functions
        )
        self.drill = SpotInterruptionDrill(self, "Drill", config=config)
        self._outputs()

    def _outputs(self) -> None:
        config = self.config
        ip = self.address.public_ip
        url = f"https://{config.domain}/" if config.domain else f"http://{ip}/"
        CfnOutput(self, "ForgejoUrl", value=url, description="Where Forgejo answers once the node is serving")
        CfnOutput(self, "ElasticIp", value=ip, description="The address that follows the node")
        if config.domain and not config.hosted_zone_id:
            CfnOutput(
                self,
                "DnsRecordToCreate",
                value=f"{config.domain}. 300 IN A {ip}",
                description="Create this A record at your DNS provider before Let's Encrypt can issue a certificate",
            )
        CfnOutput(
            self,
            "AdminPasswordCommand",
            value=(
                f"aws ssm get-parameter --with-decryption --name {config.admin_password_parameter} "
                f"--region {self.region} --query Parameter.Value --output text"
            ),
            description="Prints the generated password of the Forgejo user forgejo-admin",
        )
        CfnOutput(self, "GitSshClone", value=f"ssh://git@{config.domain or ip}/OWNER/REPO.git")
        CfnOutput(self, "BackupBucket", value=self.backups.bucket.bucket_name)
        CfnOutput(self, "DataVolumeId", value=self.data.volume.volume_id)
        CfnOutput(self, "AlertsTopicArn", value=self.alerts.topic.topic_arn)
        CfnOutput(
            self, "SpotLaunchTemplateId", value=self.node_template.spot_template.launch_template_id or ""
        )
