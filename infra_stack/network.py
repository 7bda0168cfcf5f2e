"""VPC with public subnets only (no NAT: $33/month) and the node's security group."""

from __future__ import annotations

from aws_cdk import aws_ec2 as ec2
from constructs import Construct

from infra_stack.config import SpotforgeConfig
from infra_stack.nag import acknowledge


class Network(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: SpotforgeConfig) -> None:
        super().__init__(scope, construct_id)
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=2,
            nat_gateways=0,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24)
            ],
            # The free S3 gateway endpoint keeps backup traffic off the public internet path.
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
            # Restricting the default group needs a custom-resource Lambda; nothing here uses that group.
            restrict_default_security_group=False,
        )
        acknowledge(
            self.vpc,
            "AwsSolutions-VPC7",
            "Flow logs cost more than the whole node for a one-instance forge; the security group is the "
            "boundary and CloudTrail records the control plane.",
        )

        self.security_group = ec2.SecurityGroup(
            self,
            "NodeSecurityGroup",
            vpc=self.vpc,
            description="spotforge node: HTTP/HTTPS and git SSH public, admin SSH only from adminCidr",
            allow_all_outbound=True,
        )
        for port, why in ((80, "HTTP (ACME HTTP-01, redirect)"), (443, "HTTPS"), (22, "git over SSH")):
            self.security_group.add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(port), why)
        if config.admin_cidr:
            peer = (
                ec2.Peer.ipv6(config.admin_cidr)
                if ":" in config.admin_cidr
                else ec2.Peer.ipv4(config.admin_cidr)
            )
            self.security_group.add_ingress_rule(peer, ec2.Port.tcp(2222), "admin SSH")
        acknowledge(
            self.security_group,
            "AwsSolutions-EC23",
            "A public git forge must accept 80, 443 and 22 from anywhere; admin SSH (2222) is limited to "
            "adminCidr or closed.",
        )
        acknowledge(
            self.security_group,
            "CloudFormation-Validate::W2508",
            "Port 22 is git over SSH (served by Forgejo), not host login; host sshd listens on 2222.",
        )

    def subnet_for_az(self) -> dict[str, str]:
        """AZ -> public subnet id, for the controller's launches in the volume's AZ."""
        return {subnet.availability_zone: subnet.subnet_id for subnet in self.vpc.public_subnets}
