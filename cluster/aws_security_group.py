r"""The security group of cluster/aws.yaml: SSH from one network only, every port between the nodes.

    python cluster/aws_security_group.py --ssh-cidr 203.0.113.7/32            # your address
    python cluster/aws_security_group.py --ssh-cidr 10.20.0.0/16 --vpc-id vpc-0abc --region us-west-2

Prints the group's id; put it in aws.yaml's `SecurityGroupIds` (set once on the head, the worker
types follow). Ray's own default group opens SSH to 0.0.0.0/0; this one opens nothing else to
the outside: the dashboard and the job server are reached through `ray dashboard` (an SSH tunnel).
Run again with the same name to reuse the group; its SSH rule must be the one asked for.
Credentials: your usual AWS profile or variables (it calls EC2 with boto3).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

WORLD = ("0.0.0.0/0", "::/0")


def ssh_cidr(text: str) -> str:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR (e.g. 203.0.113.7/32)") from exc
    if str(network) in WORLD:
        raise argparse.ArgumentTypeError(f"{text} is the whole internet; give your own address or network")
    if network.version != 4:
        raise argparse.ArgumentTypeError(f"{text}: give an IPv4 network (EC2's IpRanges)")
    return str(network)


def ensure_group(ec2, name: str, ssh: str, vpc_id: str | None = None) -> str:
    """The group `name` in `vpc_id` (the default VPC if None), created with the cluster's rules or checked."""
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise SystemExit("error: this region has no default VPC; pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    )["SecurityGroups"]
    if found:
        group = found[0]
        opened = sorted(_ssh_ranges(group))
        if opened != [ssh]:
            raise SystemExit(
                f"error: security group {name} ({group['GroupId']}) already exists with SSH from {opened or 'nowhere'}, "
                f"not {ssh}; change it in the EC2 console, or pass another --name"
            )
        return group["GroupId"]
    group_id = ec2.create_security_group(
        GroupName=name, Description="AlexNet on Ray: SSH from one network, all traffic between nodes", VpcId=vpc_id
    )["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=group_id,
        IpPermissions=[
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]},  # node to node: GCS, object store
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": ssh}]},
        ],
    )
    return group_id


def _ssh_ranges(group: dict) -> list[str]:
    ranges = []
    for rule in group.get("IpPermissions", []):
        if rule.get("IpProtocol") == "-1" or rule.get("FromPort", -1) <= 22 <= rule.get("ToPort", -1):
            ranges += [r["CidrIp"] for r in rule.get("IpRanges", [])]
            ranges += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
    return ranges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssh-cidr", required=True, type=ssh_cidr, help="the only network SSH is open to")
    parser.add_argument("--name", default="alexnet-ray", help="the group's name (default: alexnet-ray)")
    parser.add_argument("--vpc-id", default=None, help="the VPC (default: the region's default VPC)")
    parser.add_argument("--region", default=None, help="AWS region (default: your AWS configuration's)")
    args = parser.parse_args(argv)
    import boto3

    group_id = ensure_group(boto3.client("ec2", region_name=args.region), args.name, args.ssh_cidr, args.vpc_id)
    print(group_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
