"""The self-healing controller: state table, Lambdas, EventBridge rules and the deploy/destroy hook.

All functions share one code asset (`lambdas/`, plain files: no Docker bundling) and the public
Powertools layer. Mutating EC2 calls are limited to resources carrying this stack's tag, and
RunInstances to this stack's launch templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aws_cdk import Aws, CustomResource, Duration, Fn, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_ssm as ssm
from aws_cdk import custom_resources as cr
from constructs import Construct

from infra_stack.config import SpotforgeConfig
from infra_stack.nag import acknowledge

LAMBDA_DIR = Path(__file__).resolve().parent.parent / "lambdas"
STACK_TAG = "spotforge:stack"
# Public parameter AWS Powertools publishes per architecture and runtime (docs: "Lambda layers",
# SSM parameter /aws/service/powertools/python/{arch}/{python_version}/{version}).
POWERTOOLS_LAYER_PARAMETER = "/aws/service/powertools/python/arm64/python3.13/{version}"
# States after which a node can no longer serve; "running"/"pending" are no reason to wake up.
LOSS_STATES = ["shutting-down", "terminated", "stopping", "stopped"]


@dataclass(frozen=True)
class ControllerInputs:
    vpc: ec2.IVpc
    spot_template: ec2.LaunchTemplate
    on_demand_template: ec2.LaunchTemplate
    node_role: iam.IRole
    volume_id: str
    allocation_id: str
    bucket_name: str
    bucket_arn: str
    topic_arn: str
    topic_key_arn: str


class Controller(Construct):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: SpotforgeConfig, inputs: ControllerInputs
    ) -> None:
        super().__init__(scope, construct_id)
        self.config = config
        self.table = dynamodb.TableV2(
            self,
            "State",
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            billing=dynamodb.Billing.on_demand(),
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            # Dedupe markers and expired leases carry expires_at (epoch seconds): DynamoDB removes them.
            time_to_live_attribute="expires_at",
            # Lease, recovery record and health streak: all rebuilt from AWS state when lost.
            removal_policy=RemovalPolicy.DESTROY,
        )

        layer = lambda_.LayerVersion.from_layer_version_arn(
            self,
            "Powertools",
            ssm.StringParameter.value_for_string_parameter(
                self, POWERTOOLS_LAYER_PARAMETER.format(version=config.powertools_layer_version)
            ),
        )
        code = lambda_.Code.from_asset(
            str(LAMBDA_DIR), exclude=["**/__pycache__", "**/*.pyc", "**/.pytest_cache"]
        )
        environment = {**self._environment(config, inputs), "STATE_TABLE": self.table.table_name}

        # Every function ends in the reconciler (the rebalance handler too: snapshot, optional
        # handoff), so they share one role; the lifecycle's extra power is terminate, which the
        # reconciler needs as well.
        self.reconcile_role = self._reconcile_role(config, inputs)

        def function(name: str, module: str, timeout: int, role: iam.IRole, doc: str) -> lambda_.Function:
            log_group = logs.LogGroup(
                self,
                f"{name}Logs",
                retention=logs.RetentionDays.ONE_MONTH,
                removal_policy=RemovalPolicy.DESTROY,
            )
            log_group.grant_write(role)
            fn = lambda_.Function(
                self,
                name,
                description=doc,
                runtime=lambda_.Runtime.PYTHON_3_13,
                architecture=lambda_.Architecture.ARM_64,
                handler=f"spotforge_controller.handlers.{module}.handler",
                code=code,
                layers=[layer],
                memory_size=256,
                timeout=Duration.seconds(timeout),
                role=role,
                environment=environment,
                log_group=log_group,
                # Events arrive at least once anyway; a retry after a crash is finished by the schedule.
                retry_attempts=1,
                max_event_age=Duration.minutes(10),
            )
            acknowledge(
                fn,
                "AwsSolutions-L1",
                "Pinned to Python 3.13, the runtime the controller is written and tested for and that the "
                "Powertools layer is published for.",
            )
            return fn

        # The interruption handler carries the whole 2-minute handoff in one invocation.
        self.interruption_fn = function(
            "Interruption", "interruption", 240, self.reconcile_role, "Spot warning: launch, hand off, verify"
        )
        self.rebalance_fn = function(
            "Rebalance",
            "rebalance",
            200,
            self.reconcile_role,
            "Rebalance recommendation: snapshot now, notify",
        )
        self.reconcile_fn = function(
            "Reconcile",
            "reconcile",
            120,
            self.reconcile_role,
            "Level-triggered reconciler (state changes, schedule)",
        )
        self.health_fn = function(
            "Health", "health", 90, self.reconcile_role, "Health check of /api/healthz, remediation, metrics"
        )
        self.lifecycle_fn = function(
            "Lifecycle",
            "lifecycle",
            600,
            self.reconcile_role,
            "First node on deploy; terminate nodes on destroy",
        )
        self.functions = (
            self.interruption_fn,
            self.rebalance_fn,
            self.reconcile_fn,
            self.health_fn,
            self.lifecycle_fn,
        )
        lifecycle = self._lifecycle(inputs)
        # Rules come after the first reconcile and go before the destroy-time cleanup, so no event
        # can relaunch a node while the stack is being deleted.
        for rule in self._rules():
            rule.node.add_dependency(lifecycle)

    @staticmethod
    def _environment(config: SpotforgeConfig, inputs: ControllerInputs) -> dict[str, str]:
        subnets = inputs.vpc.public_subnets
        parts: list[str] = ["{"]
        for index, subnet in enumerate(subnets):
            parts += [
                '"',
                subnet.availability_zone,
                '":"',
                subnet.subnet_id,
                '"',
                "," if index < len(subnets) - 1 else "",
            ]
        parts.append("}")
        return {
            "STACK_NAME": config.stack_name,
            "LAUNCH_TEMPLATE_ID": inputs.spot_template.launch_template_id or "",
            "ON_DEMAND_LAUNCH_TEMPLATE_ID": inputs.on_demand_template.launch_template_id or "",
            "SUBNETS": Fn.join("", parts),
            "DATA_VOLUME_ID": inputs.volume_id,
            "EIP_ALLOCATION_ID": inputs.allocation_id,
            "BACKUP_BUCKET": inputs.bucket_name,
            "TOPIC_ARN": inputs.topic_arn,
            "INSTANCE_TYPES": ",".join(config.instance_types),
            "ON_DEMAND_FALLBACK": str(config.on_demand_fallback).lower(),
            "HANDOFF_DEADLINE_SECONDS": str(config.handoff_deadline_seconds),
            "DRAIN_TIMEOUT_SECONDS": str(config.drain_timeout_seconds),
            "PROACTIVE_REBALANCE": str(config.proactive_rebalance).lower(),
            "DOMAIN": config.domain or "",
            "HEALTH_FAILURE_THRESHOLD": str(config.health_failure_threshold),
            "POWERTOOLS_METRICS_NAMESPACE": "Spotforge",
            # One service name for all functions: metrics carry it as their only dimension (10 free metrics).
            "POWERTOOLS_SERVICE_NAME": "spotforge",
        }

    def _arn(self, service: str, resource: str) -> str:
        return f"arn:{Aws.PARTITION}:{service}:{Aws.REGION}:{Aws.ACCOUNT_ID}:{resource}"

    def _reconcile_role(self, config: SpotforgeConfig, inputs: ControllerInputs) -> iam.Role:
        role = iam.Role(
            self,
            "ReconcileRole",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description="spotforge controller: launch, move volume and EIP, drain, terminate its own nodes",
        )
        ours = {"StringEquals": {f"aws:ResourceTag/{STACK_TAG}": config.stack_name}}
        instance_arn = self._arn("ec2", "instance/*")
        template_arns = [
            self._arn("ec2", f"launch-template/{t.launch_template_id}")
            for t in (inputs.spot_template, inputs.on_demand_template)
        ]
        statements = [
            iam.PolicyStatement(
                sid="Observe",
                actions=[
                    "ec2:DescribeInstances",
                    "ec2:DescribeVolumes",
                    "ec2:DescribeAddresses",
                    "ec2:DescribeLaunchTemplates",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:DescribeSubnets",
                    "ec2:DescribeInstanceStatus",
                    "ec2:DescribeSnapshots",
                    "ssm:GetCommandInvocation",
                    "ssm:ListCommandInvocations",
                    "ssm:DescribeInstanceInformation",
                ],
                resources=["*"],
            ),
            iam.PolicyStatement(
                sid="LaunchFromOurTemplates",
                actions=["ec2:RunInstances"],
                resources=template_arns,
            ),
            iam.PolicyStatement(
                sid="LaunchCreatesTaggedInstance",
                actions=["ec2:RunInstances"],
                resources=[instance_arn],
                conditions={"StringEquals": {f"aws:RequestTag/{STACK_TAG}": config.stack_name}},
            ),
            iam.PolicyStatement(
                sid="LaunchUsesStackResources",
                actions=["ec2:RunInstances"],
                resources=[
                    self._arn("ec2", "subnet/*"),
                    self._arn("ec2", "security-group/*"),
                    self._arn("ec2", "network-interface/*"),
                    self._arn("ec2", "volume/*"),
                    self._arn("ec2", "spot-instances-request/*"),
                    f"arn:{Aws.PARTITION}:ec2:{Aws.REGION}::image/*",
                ],
            ),
            iam.PolicyStatement(
                sid="TagAtLaunch",
                actions=["ec2:CreateTags"],
                resources=[
                    instance_arn,
                    self._arn("ec2", "volume/*"),
                    self._arn("ec2", "network-interface/*"),
                    self._arn("ec2", "spot-instances-request/*"),
                ],
                conditions={"StringEquals": {"ec2:CreateAction": "RunInstances"}},
            ),
            iam.PolicyStatement(
                sid="TagOurNodes",
                actions=["ec2:CreateTags"],
                resources=[instance_arn],
                conditions=ours,
            ),
            iam.PolicyStatement(
                sid="ManageOurNodesAndVolume",
                actions=[
                    "ec2:TerminateInstances",
                    "ec2:AttachVolume",
                    "ec2:DetachVolume",
                    "ec2:AssociateAddress",
                    "ec2:DisassociateAddress",
                ],
                resources=[instance_arn, self._arn("ec2", "volume/*"), self._arn("ec2", "elastic-ip/*")],
                conditions=ours,
            ),
            iam.PolicyStatement(
                sid="SnapshotOnRebalance",
                actions=["ec2:CreateSnapshot"],
                resources=[
                    self._arn("ec2", f"volume/{inputs.volume_id}"),
                    f"arn:{Aws.PARTITION}:ec2:{Aws.REGION}::snapshot/*",
                ],
            ),
            iam.PolicyStatement(
                sid="TagNewSnapshot",
                actions=["ec2:CreateTags"],
                resources=[f"arn:{Aws.PARTITION}:ec2:{Aws.REGION}::snapshot/*"],
                conditions={"StringEquals": {"ec2:CreateAction": "CreateSnapshot"}},
            ),
            iam.PolicyStatement(
                sid="PruneOurRebalanceSnapshots",
                actions=["ec2:DeleteSnapshot"],
                resources=[f"arn:{Aws.PARTITION}:ec2:{Aws.REGION}::snapshot/*"],
                conditions={
                    "StringLike": {
                        f"aws:ResourceTag/{STACK_TAG}": config.stack_name,
                        "aws:ResourceTag/spotforge:rebalance-of": "i-*",
                    }
                },
            ),
            iam.PolicyStatement(
                # The first spot request in an account creates EC2's spot service-linked role on
                # the caller's behalf; without this a brand-new account's first launch fails.
                sid="SpotServiceLinkedRole",
                actions=["iam:CreateServiceLinkedRole"],
                resources=[
                    f"arn:{Aws.PARTITION}:iam::{Aws.ACCOUNT_ID}:role/aws-service-role/spot.amazonaws.com/"
                    "AWSServiceRoleForEC2Spot"
                ],
                conditions={"StringEquals": {"iam:AWSServiceName": "spot.amazonaws.com"}},
            ),
            iam.PolicyStatement(
                sid="PassNodeRole",
                actions=["iam:PassRole"],
                resources=[inputs.node_role.role_arn],
                conditions={"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
            ),
            iam.PolicyStatement(
                sid="RunAgentOnOurNodes",
                actions=["ssm:SendCommand"],
                resources=[instance_arn],
                conditions={"StringEquals": {f"ssm:resourceTag/{STACK_TAG}": config.stack_name}},
            ),
            iam.PolicyStatement(
                sid="RunShellDocument",
                actions=["ssm:SendCommand"],
                resources=[f"arn:{Aws.PARTITION}:ssm:{Aws.REGION}::document/AWS-RunShellScript"],
            ),
            iam.PolicyStatement(
                sid="State",
                actions=[
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                ],
                resources=[self.table.table_arn],
            ),
            iam.PolicyStatement(sid="Notify", actions=["sns:Publish"], resources=[inputs.topic_arn]),
            iam.PolicyStatement(
                sid="NotifyEncrypted",
                actions=["kms:GenerateDataKey*", "kms:Decrypt"],
                resources=[inputs.topic_key_arn],
            ),
            iam.PolicyStatement(
                sid="BackupHeartbeat",
                actions=["s3:GetObject"],
                resources=[f"{inputs.bucket_arn}/backups/heartbeat.json"],
            ),
            iam.PolicyStatement(
                sid="BackupAge",
                actions=["s3:ListBucket"],
                resources=[inputs.bucket_arn],
                conditions={"StringLike": {"s3:prefix": ["backups/*"]}},
            ),
        ]
        for statement in statements:
            role.add_to_policy(statement)
        self._acknowledge_scoped_wildcards(role)
        return role

    def _acknowledge_scoped_wildcards(self, role: iam.Role) -> None:
        reasons = {
            "Resource::*": "Describe*, GetCommandInvocation and ListCommandInvocations support no resource-level "
            "permissions.",
            "Action::kms:GenerateDataKey*": "Publishing to the encrypted topic needs the GenerateDataKey family "
            "on that one key.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:instance/*": "Node instance ids "
            "are unknown before launch; every mutating statement is conditioned on the spotforge:stack tag.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:volume/*": "Limited by the "
            "spotforge:stack tag condition (attach/detach) or to RunInstances' own root volume.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:elastic-ip/*": "Limited by the "
            "spotforge:stack tag condition.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:subnet/*": "RunInstances "
            "resources; the launch is already limited to this stack's launch templates.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:security-group/*": "RunInstances "
            "resources; the launch is already limited to this stack's launch templates.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:network-interface/*": "The "
            "network interface RunInstances creates for the node.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:spot-instances-request/*": "The "
            "spot request RunInstances creates for a spot node.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>::image/*": "The AMI comes from the AWS public SSM "
            "parameter in the launch template.",
            "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>::snapshot/*": "Snapshot ids are new at creation; "
            "deletion is limited to this stack's rebalance snapshots by tag.",
        }
        for finding, reason in reasons.items():
            acknowledge(role, f"AwsSolutions-IAM5[{finding}]", reason)

    def _rules(self) -> list[events.Rule]:
        rules: list[events.Rule] = []

        def rule(name: str, pattern: events.EventPattern, fn: lambda_.IFunction, doc: str) -> None:
            rules.append(
                events.Rule(
                    self, name, event_pattern=pattern, targets=[targets.LambdaFunction(fn)], description=doc
                )
            )

        rule(
            "SpotWarningRule",
            events.EventPattern(source=["aws.ec2"], detail_type=["EC2 Spot Instance Interruption Warning"]),
            self.interruption_fn,
            "Every spot warning in the region; the handler ignores instances that are not ours",
        )
        rule(
            "NodeSignalRule",
            events.EventPattern(source=["spotforge.node"], detail_type=["Spot Interruption Signal"]),
            self.interruption_fn,
            "The node agent saw spot/instance-action in IMDS",
        )
        rule(
            "RebalanceRule",
            events.EventPattern(source=["aws.ec2"], detail_type=["EC2 Instance Rebalance Recommendation"]),
            self.rebalance_fn,
            "Rebalance recommendations; the handler ignores instances that are not ours",
        )
        rule(
            "StateChangeRule",
            events.EventPattern(
                source=["aws.ec2"],
                detail_type=["EC2 Instance State-change Notification"],
                detail={"state": LOSS_STATES},
            ),
            self.reconcile_fn,
            "A node may have been lost; the reconciler checks what is true",
        )
        for name, fn, doc in (
            ("ReconcileSchedule", self.reconcile_fn, "Finish any step left half done"),
            ("HealthSchedule", self.health_fn, "GET /api/healthz on the public endpoint"),
        ):
            rules.append(
                events.Rule(
                    self,
                    name,
                    schedule=events.Schedule.rate(Duration.minutes(1)),
                    targets=[targets.LambdaFunction(fn, retry_attempts=0)],
                    description=doc,
                )
            )
        return rules

    def _lifecycle(self, inputs: ControllerInputs) -> CustomResource:
        provider = cr.Provider(self, "LifecycleProvider", on_event_handler=self.lifecycle_fn)
        resource = CustomResource(
            self,
            "FirstNodeAndCleanup",
            service_token=provider.service_token,
            resource_type="Custom::SpotforgeLifecycle",
            properties={
                # A new template version (new user data, versions, types) changes this, so an update
                # runs the reconciler, which replaces the node through the standby handoff.
                "SpotTemplateVersion": inputs.spot_template.latest_version_number,
                "OnDemandTemplateVersion": inputs.on_demand_template.latest_version_number,
            },
        )
        # Created after the network and the controller, deleted before them: on destroy, nodes are
        # gone before the subnets and the functions that would notice their loss.
        resource.node.add_dependency(inputs.vpc)
        for child in self.node.children:
            if child is not resource and child is not provider:
                resource.node.add_dependency(child)
        acknowledge(
            provider,
            "AwsSolutions-L1",
            "The CDK Provider framework picks its own Node.js runtime for the response function.",
        )
        acknowledge(
            provider,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole]",
            "The Provider framework's response function uses the basic execution role.",
        )
        acknowledge(
            provider,
            f"AwsSolutions-IAM5[Resource::<{Stack.of(self).get_logical_id(self.lifecycle_fn.node.default_child)}.Arn>:*]",
            "The Provider framework invokes any version of the lifecycle function.",
        )
        return resource
