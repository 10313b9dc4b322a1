package io.kubegrpc.peers;

import java.util.concurrent.atomic.AtomicLong;

/** What {@code Echo/Stats} reports. */
final class Counters {
  final AtomicLong requests = new AtomicLong();
  final AtomicLong connectionsAccepted = new AtomicLong();
  final AtomicLong connectionsOpen = new AtomicLong();
  final AtomicLong healthWatchesOpen = new AtomicLong();
  final AtomicLong healthChecks = new AtomicLong();
  final AtomicLong tooManyPings = new AtomicLong();
}
