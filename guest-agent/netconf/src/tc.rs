//! The traffic-control half of the "tcfilter" model: an ingress qdisc on the pod interface and on
//! its tap, each with a match-all u32 filter whose `mirred` action redirects every frame to the
//! egress of the other — what
//! `tc filter add dev X parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev Y`
//! does.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use nix::errno::Errno;
use std::time::Duration;

use crate::netlink::Rtnl;
use crate::NetError;

/// The ingress qdisc's own handle, `ffff:`; also the parent of its filters.
const INGRESS_HANDLE: TcHandle = TcHandle { major: 0xffff, minor: 0 };
/// The kind of the ingress qdisc.
const INGRESS_KIND: &str = "ingress";
/// Adding an ingress qdisc can meet EBUSY while the kernel still tears down a previous one;
/// Kata retries the same way (linear backoff).
const QDISC_ADD_ATTEMPTS: u32 = 5;
const QDISC_ADD_BACKOFF: Duration = Duration::from_millis(10);

/// `ETH_P_ALL` in network byte order, as the filter's protocol (the low half of `tcm_info`).
fn protocol_all() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

/// The RTM_NEWQDISC message for an ingress qdisc on link `index`.
pub(crate) fn ingress_qdisc_message(index: u32) -> TcMessage {
    let mut message = TcMessage::with_index(index as i32);
    message.header.parent = TcHandle::INGRESS;
    message.header.handle = INGRESS_HANDLE;
    message.attributes.push(TcAttribute::Kind(INGRESS_KIND.to_owned()));
    message
}

/// Add the ingress qdisc to interface `name`.
pub(crate) fn add_ingress_qdisc(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetError> {
    let what = format!("add an ingress qdisc to interface {name}");
    let mut attempt = 1;
    loop {
        let result = rtnl.change(
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc_message(index)),
            NLM_F_CREATE | NLM_F_EXCL,
            &what,
        );
        match result {
            Err(e) if e.errno() == Some(Errno::EBUSY) && attempt < QDISC_ADD_ATTEMPTS => {
                std::thread::sleep(QDISC_ADD_BACKOFF * attempt);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Delete the ingress qdisc (and so its filters) of interface `name`; none there is fine.
pub(crate) fn delete_ingress_qdisc(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetError> {
    let mut message = TcMessage::with_index(index as i32);
    message.header.parent = TcHandle::INGRESS;
    rtnl.change_allowing(
        RouteNetlinkMessage::DelQueueDiscipline(message),
        0,
        &[Errno::ENOENT, Errno::ENODEV],
        &format!("delete the ingress qdisc of interface {name}"),
    )
}

/// The RTM_NEWTFILTER message redirecting everything arriving on link `from` to the egress of
/// link `to`.
pub(crate) fn redirect_filter_message(from: u32, to: u32) -> TcMessage {
    let mut message = TcMessage::with_index(from as i32);
    message.header.parent = INGRESS_HANDLE;
    // Priority 0: the kernel picks one, as for `tc filter add` without `pref`.
    message.header.info = u32::from(TcHandle { major: 0, minor: protocol_all() });

    // `match u8 0 0`: one key, mask 0, value 0 — matches every frame.
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];

    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_owned()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
    ];

    message.attributes.push(TcAttribute::Kind(TcFilterU32::KIND.to_owned()));
    message.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    message
}

/// Redirect everything arriving on interface `from_name` to the egress of `to_name`.
pub(crate) fn add_redirect_filter(
    rtnl: &mut Rtnl,
    (from, from_name): (u32, &str),
    (to, to_name): (u32, &str),
) -> Result<(), NetError> {
    rtnl.change(
        RouteNetlinkMessage::NewTrafficFilter(redirect_filter_message(from, to)),
        NLM_F_CREATE | NLM_F_EXCL,
        &format!("add a filter redirecting interface {from_name} to {to_name}"),
    )
}

/// The links that have an ingress qdisc.
pub(crate) fn links_with_ingress_qdisc(rtnl: &mut Rtnl) -> Result<Vec<u32>, NetError> {
    let messages = rtnl.dump(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()), "list the qdiscs")?;
    let mut links: Vec<u32> = messages
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) => Some(q),
            _ => None,
        })
        .filter(|q| q.header.parent == TcHandle::INGRESS)
        .filter(|q| q.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == INGRESS_KIND)))
        .filter_map(|q| u32::try_from(q.header.index).ok())
        .collect();
    links.sort_unstable();
    links.dedup();
    Ok(links)
}

/// The links the u32 `mirred` filters under the ingress qdisc of link `index` redirect to.
pub(crate) fn ingress_redirect_targets(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<Vec<u32>, NetError> {
    let mut request = TcMessage::with_index(index as i32);
    request.header.parent = INGRESS_HANDLE;
    let messages = match rtnl
        .dump(RouteNetlinkMessage::GetTrafficFilter(request), &format!("list the ingress filters of interface {name}"))
    {
        Ok(messages) => messages,
        // The link or its qdisc went away meanwhile: nothing redirects.
        Err(e) if matches!(e.errno(), Some(Errno::ENODEV | Errno::ENOENT | Errno::EINVAL)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
            _ => None,
        })
        .flat_map(mirred_targets)
        .collect())
}

/// The `mirred` targets of one u32 filter message.
pub(crate) fn mirred_targets(filter: &TcMessage) -> Vec<u32> {
    let is_u32 = filter.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == TcFilterU32::KIND));
    if !is_u32 {
        return Vec::new();
    }
    let mut targets = Vec::new();
    for attribute in &filter.attributes {
        let TcAttribute::Options(options) = attribute else {
            continue;
        };
        for option in options {
            let TcOption::U32(TcFilterU32Option::Action(actions)) = option else {
                continue;
            };
            for action in actions {
                for action_attribute in &action.attributes {
                    let TcActionAttribute::Options(action_options) = action_attribute else {
                        continue;
                    };
                    for action_option in action_options {
                        if let TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror)) = action_option {
                            targets.push(mirror.ifindex);
                        }
                    }
                }
            }
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};
    use netlink_packet_route::tc::TcMessageBuffer;

    #[test]
    fn the_redirect_filter_is_what_tc_would_send() {
        let m = redirect_filter_message(3, 9);
        assert_eq!(m.header.index, 3);
        assert_eq!(u32::from(m.header.parent), 0xffff_0000);
        // Priority 0 (kernel-chosen), protocol ETH_P_ALL in network byte order.
        assert_eq!(m.header.info.to_ne_bytes()[..2], (0x0003u16).to_be().to_ne_bytes()[..]);
        assert_eq!(m.header.info >> 16, 0);
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        let parsed = TcMessage::parse(&TcMessageBuffer::new(&buf)).unwrap();
        assert_eq!(mirred_targets(&parsed), vec![9]);
        let selector = parsed.attributes.iter().find_map(|a| match a {
            TcAttribute::Options(o) => o.iter().find_map(|o| match o {
                TcOption::U32(TcFilterU32Option::Selector(s)) => Some(s.clone()),
                _ => None,
            }),
            _ => None,
        });
        let selector = selector.unwrap();
        assert_eq!(selector.flags, TcU32SelectorFlags::Terminal);
        assert_eq!(selector.nkeys, 1);
        assert_eq!(selector.keys, vec![TcU32Key::default()]);
    }

    #[test]
    fn the_mirred_action_steals_and_redirects_to_egress() {
        let m = redirect_filter_message(1, 2);
        let mut found = false;
        for a in &m.attributes {
            let TcAttribute::Options(options) = a else {
                continue;
            };
            for o in options {
                let TcOption::U32(TcFilterU32Option::Action(actions)) = o else {
                    continue;
                };
                let opts = actions[0].attributes.iter().find_map(|a| match a {
                    TcActionAttribute::Options(o) => Some(o),
                    _ => None,
                });
                let Some(TcActionOption::Mirror(TcActionMirrorOption::Parms(p))) = opts.unwrap().first() else {
                    panic!("no mirred parameters")
                };
                assert_eq!(p.generic.action, TcActionType::Stolen);
                assert_eq!(p.eaction, TcMirrorActionType::EgressRedir);
                assert_eq!(actions[0].tab, 1);
                found = true;
            }
        }
        assert!(found);
    }

    #[test]
    fn the_ingress_qdisc_hangs_off_ffff_fff1_with_handle_ffff() {
        let m = ingress_qdisc_message(5);
        assert_eq!(u32::from(m.header.parent), 0xffff_fff1);
        assert_eq!(u32::from(m.header.handle), 0xffff_0000);
        assert!(m.attributes.contains(&TcAttribute::Kind("ingress".into())));
    }

    #[test]
    fn filters_of_other_kinds_have_no_targets() {
        let mut m = redirect_filter_message(1, 2);
        m.attributes[0] = TcAttribute::Kind("matchall".into());
        assert!(mirred_targets(&m).is_empty());
    }
}
