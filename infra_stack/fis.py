"""A Fault Injection Service experiment that interrupts the running spot node, for a drill on the
real deployment (`aws fis start-experiment --experiment-template-id <output>`). It costs nothing
until started; each run is billed per action-minute."""

from __future__ import annotations

from aws_cdk import Aws
from aws_cdk import aws_fis as fis
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra_stack.config import SpotforgeConfig
from infra_stack.nag import acknowledge


class SpotInterruptionDrill(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, config: SpotforgeConfig) -> None:
        super().__init__(scope, construct_id)
        role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("fis.amazonaws.com"),
            description="spotforge drill: interrupt this stack's spot node",
        )
        role.add_to_policy(
            iam.PolicyStatement(
                sid="InterruptOurNode",
                actions=["ec2:SendSpotInstanceInterruptions"],
                resources=[f"arn:{Aws.PARTITION}:ec2:{Aws.REGION}:{Aws.ACCOUNT_ID}:instance/*"],
                conditions={"StringEquals": {"aws:ResourceTag/spotforge:stack": config.stack_name}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(sid="FindTargets", actions=["ec2:DescribeInstances"], resources=["*"])
        )
        acknowledge(
            role, "AwsSolutions-IAM5[Resource::*]", "ec2:DescribeInstances has no resource-level permissions."
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]",
            "Only instances tagged with this stack can be interrupted.",
        )
        self.template = fis.CfnExperimentTemplate(
            self,
            "Template",
            description=f"{config.stack_name}: spot interruption drill (warning, then termination after 2 minutes)",
            role_arn=role.role_arn,
            stop_conditions=[
                fis.CfnExperimentTemplate.ExperimentTemplateStopConditionProperty(source="none")
            ],
            targets={
                "node": fis.CfnExperimentTemplate.ExperimentTemplateTargetProperty(
                    resource_type="aws:ec2:spot-instance",
                    resource_tags={"spotforge:stack": config.stack_name, "spotforge:role": "node"},
                    filters=[
                        fis.CfnExperimentTemplate.ExperimentTemplateTargetFilterProperty(
                            path="State.Name", values=["running"]
                        )
                    ],
                    selection_mode="ALL",
                )
            },
            actions={
                "interrupt": fis.CfnExperimentTemplate.ExperimentTemplateActionProperty(
                    action_id="aws:ec2:send-spot-instance-interruptions",
                    parameters={"durationBeforeInterruption": "PT2M"},
                    targets={"SpotInstances": "node"},
                )
            },
            tags={"Name": f"{config.stack_name}-spot-drill", "spotforge:stack": config.stack_name},
        )
