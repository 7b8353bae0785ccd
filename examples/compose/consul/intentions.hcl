# dashboard may call counting; nobody else may.
Kind = "service-intentions"
Name = "counting"
Sources = [
  {
    Name   = "dashboard"
    Action = "allow"
  },
  {
    Name   = "*"
    Action = "deny"
  },
]
